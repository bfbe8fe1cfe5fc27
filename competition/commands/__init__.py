"""The command line's stages, one module each: ``add(sub)`` builds its parser, ``run(args)`` parses, calls
its one stage function and prints (``cli`` assembles them)."""
