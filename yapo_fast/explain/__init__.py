"""Explain a steering vector in SAE features: which it moves, what they mean (yapo-fast explain).

- ranking.py: YaPO entries ranked by effect |m*v_i|*||W_dec[i]||, add vs cap, top-k shares
- dense_projection.py: a BiPO/CAA vector against the SAE's decoder (cosines, matching pursuit)
- activation_index.py: cached top-N activating corpus contexts per latent (streaming build)
- logit_lens.py: decoder directions through the final norm and unembedding
- data_stats.py: feature frequency and mean on the training data, chosen vs rejected
- core.py: explain() -> report dict; write_report(); report_md.py / report_html.py render it
"""

from yapo_fast.explain.core import DEFINITIONS, explain, write_report
from yapo_fast.explain.ranking import RankedEntry, Ranking, rank_entries, rank_vector

explain_vector = explain

__all__ = [
    "DEFINITIONS",
    "RankedEntry",
    "Ranking",
    "explain",
    "explain_vector",
    "rank_entries",
    "rank_vector",
    "write_report",
]
