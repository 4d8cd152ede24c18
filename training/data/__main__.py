"""Convert a folder-per-identity dataset to insightface RecordIO: python -m training.data SRC DST_PREFIX."""
from training.data.recordio import main

main()
