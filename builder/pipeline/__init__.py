"""The pipeline: the plan, the stage table, the build context and the stages."""
