"""Corpus-scale transcription on Ray Data (07_transcribe_corpus.py).

inputs.py: folders, globs and manifests -> files and their keys; worker.py: the transcription actor
(one Engine each); pipeline.py: the Ray Data graph, resuming and the summary; store.py: the Parquet
output folder (one dataset, one row per file; atomic parts merged into it); cli.py: the command line.
A run's output folder is read as any Parquet dataset (`pandas.read_parquet(folder)`);
`read_corpus(folder)` (store.py) also holds the rows of a run still going.
"""
