"""pdserve.cluster.launch: running pools of workers and the router.

``launcher`` starts a cluster from pool sizes on Ray, ``plan_launcher`` turns a plan into
Ray placement groups, ``placement_check`` tells before anything starts whether the Ray
cluster can hold it, and ``local`` runs the same workers and router in one process
without Ray. The launchers import Ray inside the functions that use it.
"""
