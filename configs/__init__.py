"""Preset YAML files (shipped as the data package hfaccel.configs). `hfaccel presets` lists them."""
