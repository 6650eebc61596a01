"""Benchmarks: tables of ratios measured side by side in one run (``vlm_bench``, dispatched by ``cli``).

``engine_bench`` budgets against stock generate; ``mini_bench`` LLaVA-Mini against LLaVA-1.5;
``multi_image_bench`` surround view and history; ``node_bench`` the node's overhead over DDS, with
``burst_callers`` (many caller processes); ``harness`` the measuring and reporting they share;
``inputs`` the photos and questions they measure on.
"""
