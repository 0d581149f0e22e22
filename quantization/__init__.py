"""4/8-bit LLaDA-MoE with bitsandbytes.

Not yet implemented: the presets and loaders arrive with their own issue. The experts are already stored as plain
`nn.Linear` containers (`mlp.experts.gate_up` / `mlp.experts.down`), the layout bitsandbytes quantizes.
"""
