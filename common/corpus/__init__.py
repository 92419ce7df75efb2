"""Corpus-scale transcription on Ray Data (07_transcribe_corpus.py).

inputs.py: folders, globs and manifests -> files and their keys; worker.py: the transcription actor
(one Engine each); pipeline.py: the Ray Data graph, resuming and the summary; store.py: the Parquet
output folder (atomic parts, one row per file when read); cli.py: the command line.
`read_corpus(folder)` (store.py) reads a run's rows back, one per file.
"""
