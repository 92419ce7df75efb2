"""Who spoke when: CAM++ embeddings of speech windows, funasr's clustering, a speaker per segment and sentence."""
