"""SeqIO tasks of the study; `import tasks` (MIXTURE_OR_TASK_MODULE=tasks) registers them.

The vocabulary comes from DOA_VOCAB or doa_jax.data.vocabulary.set_default_vocabulary (set by the
entry points from gin's VOCABULARY before this import); see that module.
"""

from tasks.jsonl_task import (read_pseudo_labels, register_budget_tasks, register_jsonl_task,
                              register_pseudo_labeled_task)
from tasks.paper_tasks import register_paper_tasks
from tasks import toy  # noqa: F401  (registers doa_toy, the synthetic offline task)

register_paper_tasks()

__all__ = ['read_pseudo_labels', 'register_budget_tasks', 'register_jsonl_task',
           'register_paper_tasks', 'register_pseudo_labeled_task']
