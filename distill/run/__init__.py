"""Running a recipe: pipeline (stages in order, run folder, resume, lock), pre-flight, ownership, report."""
