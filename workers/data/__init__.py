"""Datasets: pose (MPII, LSP, the embedded synthetic set) and classification (ImageFolder, the
embedded digits set), with their geometry and heatmap codecs."""
