"""`prefloop demo`: one command that sets up a project and runs the RLHF loop on a laptop CPU.

    prompts.jsonl   the bundled prompt set (no completions; keywords and a train/held-out split
                    in each prompt's metadata)
    preference.py   the simulated annotators' documented preference (pure)
    setup.py        accounts, the demo project, its loop settings and the first generate jobs
    annotators.py   simulated annotators labelling through the HTTP JSON API
    watch.py        reading the loop's progress and the new policy's win rate from the database
    run.py          the command itself: web app and worker as subprocesses, stages printed

Everything here goes through the same services, HTTP API and worker as a real deployment; the
demo only picks small sizes and plays the annotators.
"""
