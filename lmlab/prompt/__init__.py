"""Prompting (Zhao et al. §6): the code sandbox that tools and program-aided reasoning run
generated code in (`sandbox`)."""
