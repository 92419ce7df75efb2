"""What a transcription gives back: typed results, CTC alignment, subtitles and the file writers."""
