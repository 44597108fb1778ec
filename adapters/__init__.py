"""Sources and sinks. Adapters know nothing of the model: a source yields bytes."""
