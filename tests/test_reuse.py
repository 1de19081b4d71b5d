"""pipeline.decoding.reuse: which requests read an option off their node's rollout, the claim
that option makes among its siblings, and the order the options come back in."""

from mcts.types import ExpandRequest
from pipeline.decoding.reuse import RolloutReuse
from pipeline.lm.stopping import Generation, OptionClaims


def gen(text: str, ids: list[int], replayed: bool = False) -> Generation:
    return Generation(text=text, token_ids=ids, logprobs=[-1.0] * len(ids), finished=False,
                      stopped=True, replayed=replayed)


def first_line(ids: list[int], logprobs: list[float]) -> Generation:
    """A replay stand-in: the option is the tokens up to the first 0 (the 'newline')."""
    end = ids.index(0) + 1 if 0 in ids else len(ids)
    return gen(" ".join(map(str, ids[:end])), ids[:end], replayed=True)


def request(tree: int, node: int, n: int) -> ExpandRequest:
    return ExpandRequest(tree_index=tree, node_id=node, prompt="p", steps=[], num_options=n)


def test_a_node_reads_its_finished_rollout_once_and_its_option_comes_first():
    claims = OptionClaims()
    reuse = RolloutReuse(first_line, claims)
    reuse.keep(0, 1, [5, 6, 0, 7], [-0.5] * 4, finished=True)
    reuse.keep(0, 2, [8, 0], [-0.5] * 2, finished=False)  # cut at its cap: not read
    reuse.keep(1, 0, [], [], finished=True)  # nothing to read
    wanted = [request(0, 1, 2), request(0, 2, 2), request(1, 0, 3)]
    fresh, taken = reuse.split(wanted)
    assert [r.num_options for r in fresh] == [1, 2, 3] and reuse.reused == 1
    assert taken[0].token_ids == [5, 6, 0] and taken[1] is None and taken[2] is None
    decoded = [gen(f"row {k}", [100 + k]) for k in range(6)]  # the fresh requests' rows, in order
    joined = RolloutReuse.join(fresh, taken, decoded)
    assert joined[0] is taken[0] and joined[1:] == decoded  # each request's own first
    assert len(joined) == sum(r.num_options for r in wanted)
    again, _ = reuse.split([request(0, 1, 2)])  # the node's next expansion samples every option
    assert again[0].num_options == 2 and reuse.reused == 1


def test_a_reused_option_is_claimed_before_any_decoded_row():
    """A sampled sibling that repeats the reused option, token for token, is the repeat, in the
    first call (epoch) as in any later one, so the decoder cuts it at its boundary."""
    claims = OptionClaims()
    reuse = RolloutReuse(first_line, claims)
    reuse.keep(3, 4, [5, 0, 9], [-0.5] * 3, finished=True)
    reuse.split([request(3, 4, 2)])
    epoch = claims.epoch()
    assert not claims.claim((3, 4), (5, 0), (epoch, 0))
    assert claims.claim((3, 4), (6, 0), (epoch, 1)) and claims.claim((3, 5), (5, 0), (epoch, 2))


def test_a_rollout_of_whitespace_gives_no_option():
    reuse = RolloutReuse(lambda ids, lps: gen("  \n", ids, replayed=True))
    reuse.keep(0, 0, [1, 2], [-1.0, -1.0], finished=True)
    fresh, taken = reuse.split([request(0, 0, 3)])
    assert fresh[0].num_options == 3 and taken == [None] and reuse.reused == 0
