"""The driver process of a training run: validate -> prepare data -> open tracking -> launch ->
publish -> summary (:mod:`.run`), and what every command-line entry point shares (:mod:`.cli`).
"""
