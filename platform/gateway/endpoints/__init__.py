"""The /v1 endpoint families, one module each: parse the body, run the pipeline, shape the reply."""
