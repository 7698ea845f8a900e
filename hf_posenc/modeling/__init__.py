"""The code that ships beside every saved posenc model's config.json (the `trust_remote_code` closure).

Every file here is a flat sibling that imports only the standard library, torch, transformers (and `packaging`, which
transformers requires) and its siblings (single-dot relative imports): transformers copies the closure on
`save_pretrained` and refuses any other absolute import on load. This `__init__` is not shipped.
"""
