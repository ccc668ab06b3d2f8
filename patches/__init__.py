"""Architecture specs, one YAML file per model family (shipped as the data package hfaccel.patches)."""
