"""The packaged demo model, `shapes`, and what made and judges it: the captioned-shapes dataset (shapes.py), the
analytic checker (checker.py), the quality gate behind `python -m engine eval` (evaluate.py), the training
recipe (`python -m engine.demo.train`) and the model's files (models/shapes/)."""
