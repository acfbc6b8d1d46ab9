"""Best-checkpoint ranking: the metric's direction, then the tie-break metric."""

from jaxser.train.checkpoint import is_better, rank_key


def test_lower_kl_wins_and_ties_go_to_higher_cosine():
    best = {"kl": 0.5, "cosine": 0.80}
    assert is_better({"kl": 0.4, "cosine": 0.1}, best, "kl", "cosine")
    assert not is_better({"kl": 0.6, "cosine": 0.99}, best, "kl", "cosine")
    assert is_better({"kl": 0.5, "cosine": 0.81}, best, "kl", "cosine")
    assert not is_better({"kl": 0.5, "cosine": 0.81}, best, "kl")
    assert is_better({"kl": 9.0}, None, "kl")


def test_rank_key_sorts_like_orbax_keeps_the_best():
    runs = [{"kl": 0.5, "cosine": 0.7}, {"kl": 0.5, "cosine": 0.9}, {"kl": 0.6, "cosine": 1.0}]
    # Orbax sorts by the key (descending for 'min' metrics) and keeps the last n.
    ranked = sorted(runs, key=rank_key("kl", "cosine"), reverse=True)
    assert ranked[-1] == {"kl": 0.5, "cosine": 0.9}
    ranked = sorted(runs, key=rank_key("cosine", "kl"))
    assert ranked[-1]["cosine"] == 1.0


def test_higher_is_better_metric_with_lower_is_better_tiebreak():
    assert is_better({"ua": 0.7, "kl": 0.3}, {"ua": 0.7, "kl": 0.4}, "ua", "kl")
    assert not is_better({"ua": 0.7, "kl": 0.5}, {"ua": 0.7, "kl": 0.4}, "ua", "kl")
