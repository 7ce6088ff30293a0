"""The name of every asset, which is also its folder in the store (``<store>/<project>/<name>/``).

Consumers import these names, not the module that produces an asset, so a stage reads its
inputs by name through the store and no asset module imports another for a constant. The
names are our users' words (the design card's), so they stay even where an asset now holds
more than its name says (``lsh_index`` is flat, IVF, HNSW or LSH; see its description).
"""

# per shard
INVENTORY = "image_inventory"
SANITIZED = "sanitized_images"
COPY_EMBEDDINGS = "sscd_embeddings"
SEMANTIC_EMBEDDINGS = "semantic_embeddings"
QUALITY = "quality_scores"
ROTATION = "rotation_predictions"
PHASHES = "perceptual_hashes"
EXAMPLE_DISTANCES = "example_distances"
AESTHETIC = "aesthetic_scores"
# global
EXAMPLE_EMBEDDINGS = "example_embeddings"
EXACT = "exact_duplicates"
INDEX = "lsh_index"
PAIRS = "duplicate_pairs"
GROUPS = "duplicate_groups"
FILTER_DECISIONS = "filter_decisions"
CLUSTERS = "hierarchical_clusters"
SAMPLE = "curated_sample"
DECONTAMINATION = "decontamination"
RETRIEVAL = "retrieval_selection"
DECISIONS = "curation_decisions"
EXPORT = "curated_dataset"
REPORT = "curation_report"
# labeled datasets
LEAKS = "train_test_leaks"
LABEL_ISSUES = "label_issues"
REVIEW = "review_manifest"
CLEANING = "cleaning_outputs"
CLASS_SUBSETS = "class_subsets"
# store folders that are no assets
MANIFESTS = "shard_manifests"
APPLY_JOURNALS = "apply_journals"
REFERENCE_EMBEDDINGS = "reference_embeddings"  # vectors of the reference sets, per set and model
