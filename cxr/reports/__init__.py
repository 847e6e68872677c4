"""Reports for people: the self-contained HTML worklist and the summary report (Markdown + PNG plots).

Torch-free: they read the database and the heatmap PNGs the workers wrote.
"""
