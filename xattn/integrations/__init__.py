"""Adapters that plug xattn into other libraries' attention hooks.

    xattn.integrations.transformers.register()   # attn_implementation="xattn" in transformers

Each adapter imports its library only when it is used: `import xattn` stays NumPy-only.
"""
