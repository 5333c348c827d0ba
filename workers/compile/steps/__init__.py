"""The compile pipeline's steps, one module each; workers/compile/pipeline.py runs them in order."""
