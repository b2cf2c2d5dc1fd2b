"""The pipeline's domain code: plain functions, one subpackage per stage, no Prefect.

Flows (``esvr.flows``) call these functions and wrap them in cached Prefect tasks; the models they
use come from ``esvr.models``. A module here imports only its own layer and the one below.
"""
