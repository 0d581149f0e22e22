"""TRL trainers for LLaDA-MoE: masked-diffusion SFT and VRPO preference optimization.

Not yet implemented: the trainers arrive with their own issue. The package exists so the distribution's layout is
final; it exports nothing until then.
"""
