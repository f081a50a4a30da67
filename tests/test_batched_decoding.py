"""Which prompt prefixes batched decoding runs once (pipelines/clients/batched_decoding.py), without a model. Batched
answers with the packaged model are tested in test_local_models.py.
"""

from __future__ import annotations

from pipelines.clients.batched_decoding import PrefixNode, plan_prefix_tree

SYSTEM = list(range(100, 140))  # 40 tokens every prompt starts with (chat template + system text)
SHOTS_A = list(range(200, 240))  # 40 more the prompts of one query type share (its few-shot examples)
SHOTS_B = list(range(300, 340))


def test_plan_prefix_tree_runs_nested_shared_prefixes_once():
    prompts = [
        SYSTEM + SHOTS_A + [1, 2],
        SYSTEM + SHOTS_B + [4, 5],
        SYSTEM + SHOTS_A + [3],
        SYSTEM + [7],  # shares only the system text
        SYSTEM + SHOTS_B + [6],
    ]
    nodes, deepest = plan_prefix_tree(prompts, min_tokens=32)
    assert nodes == [
        PrefixNode(0, 40, None, (0, 1, 2, 3, 4)),
        PrefixNode(40, 80, 0, (0, 2)),  # the parent's tokens are not run again: [40, 80) from node 0's cache
        PrefixNode(40, 80, 0, (1, 4)),
    ]
    assert deepest == [1, 2, 1, 0, 2]


def test_plan_prefix_tree_leaves_every_prompt_a_token_of_its_own():
    # The logits that start an answer come from a prompt's last token, so no shared prefix may hold it: not for
    # identical prompts, nor for a prompt that is the start of another.
    prompt = list(range(50))
    assert plan_prefix_tree([prompt, prompt], min_tokens=8) == ([PrefixNode(0, 49, None, (0, 1))], [0, 0])
    assert plan_prefix_tree([prompt, prompt + [7, 8]], min_tokens=8) == ([PrefixNode(0, 49, None, (0, 1))], [0, 0])


def test_plan_prefix_tree_skips_short_shared_runs():
    # 3 tokens shared by all are not worth a forward pass of their own; the 43 two prompts share are, from token 0.
    prompts = [[1, 2, 3, *SHOTS_A, 5], [1, 2, 3, *SHOTS_A, 6], [1, 2, 3, 9, 9]]
    assert plan_prefix_tree(prompts, min_tokens=32) == ([PrefixNode(0, 43, None, (0, 1))], [0, 0, None])
    # Fewer shared tokens than the minimum: nothing is shared, each prompt runs whole.
    assert plan_prefix_tree(prompts, min_tokens=44) == ([], [None, None, None])
    assert plan_prefix_tree([], min_tokens=1) == ([], [])
    assert plan_prefix_tree([SYSTEM], min_tokens=1) == ([], [None])
