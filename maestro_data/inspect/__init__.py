"""Looking at the data: band statistics and the band groups and factors they suggest (``stats``, ``proposal``),
one tile or what the loader makes of it as a figure (``show``, ``figures``). Pure computation at the core;
matplotlib only in the figure-writing edge (the ``plots`` extra)."""
