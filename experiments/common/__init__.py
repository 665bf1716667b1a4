"""Helpers the experiments share: test problems, recurrent cells, the diffusion
model, DEQ models, the character LM and the readers of bundled data. Nothing
here is an experiment: the lab runs the modules one level up."""
