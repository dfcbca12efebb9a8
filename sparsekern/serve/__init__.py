"""``sparsekern serve DIR``: an OpenAI-compatible server for a dense or pruned model folder.

:mod:`sparsekern.serve.app` builds the app on transformers' serving handlers;
:mod:`sparsekern.serve.requests` checks request bodies; :mod:`sparsekern.serve.cli` is the command.
"""
