"""Command-line tools built on the engine and the client: ``tiny_model`` (``vlm_tiny_model``: offline
random checkpoints in the published layouts, with ``tiny_model_mini`` for LLaVA-Mini and ``tokenizer``),
``published_replica`` (``vlm_published_replica``: small random-weight replicas of published checkpoints from
their config files), ``sample_bag`` (``vlm_make_sample_bag``: a rosbag2 of real photos) and ``demo``
(``vlm_demo``)."""
