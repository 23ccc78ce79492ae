"""A drafted token's cost in rounds of k after a target pass (calibrate.measure_draft_round)."""
import sys

import llama_cpp  # noqa: F401  before numpy

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.calibrate import measure, measure_draft_round

t = GGUFModel(sys.argv[1], LoadOptions(n_ctx=512))
d = GGUFModel(sys.argv[2], LoadOptions(n_ctx=512))
c = measure(t, d, k_max=6)
print(f"back to back {c.draft_alone * 1e3:.3f} ms, in rounds of 2 {c.draft * 1e3:.3f} ms, "
      f"target step {c.verify[0] * 1e3:.2f} ms")
for k in (1, 2, 3, 4, 6):
    v = [measure_draft_round(t, d, k) for _ in range(3)]
    print(f"rounds of {k}: " + " ".join(f"{x * 1e3:.3f}" for x in v) + " ms a token")
