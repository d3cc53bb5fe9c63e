"""passlab: a compiler-pass playground for operation fusion.

The package namespace is mapped onto the repository's top-level folders
(``passlab.graphs`` -> ``graphs/`` ...), so the repo root shows the architecture.
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import passlab.graphs` stays light and layering stays one-way.
    if name == "optimize":
        from passlab.tools.optimize import optimize
        return optimize
    if name in ("load", "capture"):
        import passlab.graphs as g
        return getattr(g, name)
    if name == "inductor_pass":     # passlab passes as Inductor's post-grad custom pass (torch >= 2.11)
        from passlab.passes.inductor import inductor_pass
        return inductor_pass
    if name in ("register_pass", "PassResult"):
        import passlab.passes as p
        return getattr(p, name)
    raise AttributeError(f"module 'passlab' has no attribute {name!r}")
