"""`cache-teachers`: the Ray Data pipeline that runs every teacher once per image into the store (``config``,
``stages`` run in Ray tasks and actors, ``resources``, ``pipeline`` the driver); its inputs come from
``radio_dist.sources``."""
