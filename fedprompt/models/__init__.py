"""The models: the zoo of frozen causal LMs and its cache (zoo), tiny random test models (tiny), and students cut
from a teacher for POST (student)."""
