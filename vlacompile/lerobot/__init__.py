"""LeRobot's formats and conventions that more than one family reads: policy directories
(``policy_dir``: config.json with "type", processor pipelines, normaliser state files) and the
normalisation modes (``normalize``). Nothing here imports lerobot: the formats are read as files."""
