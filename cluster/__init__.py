"""Where things run: the Ray connection and the sizing of worker groups against cluster resources."""
