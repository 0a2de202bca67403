"""The Hugging Face transformers form of an export (lamda-export --format hf).

configuration_lamda.py and modeling_lamda.py are not part of lamda_pipe at run time: they are
copied into the export dir and loaded from there by transformers (trust_remote_code), on
machines that need not have lamda_pipe. Nothing in lamda_pipe imports them, and nothing here
imports transformers (the trainer must not need it). hf_files.py writes the rest of the dir.
"""
