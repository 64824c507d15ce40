"""The data: bundled and local datasets (datasets), public distillation corpora (corpora), label-skewed splits
for holders (partition), and the files shipped inside packages on the package registry (package_archives)."""
