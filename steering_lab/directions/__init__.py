"""Where directions come from beyond contrast extraction: transport maps, function vectors, cross-model transfer."""
