"""What every stage stands on: model resolution, chat formats, inference engines, roles, prompt sources, the run layout."""
