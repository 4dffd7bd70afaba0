"""The run configuration: its schema (`runconfig.schema`), imported by every layer of raylaunch."""
