"""The learned parts of gcache and the graphs they act on, one concept per module.

- `topology`: which edges may exist (topology masks, the judger edges) and fixed graphs;
- `sampling`: DAGs sampled from edge logits, edge probabilities and entropy, waves;
- `network`: `GraphPolicy`, the GCN + MLP that scores every edge for a question;
- `loss`: REINFORCE with a leave-one-out baseline;
- `cache_fuser`: `CacheFuser`, the learned gates where the judger reads senders' caches;
- `simulate`: the policy alone on a routing task (sample efficiency without an LM).
"""
