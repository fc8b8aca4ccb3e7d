"""Actor back-ends behind one interface (``pool.ActorPool``): local processes, remote torch.distributed
nodes; the acting policy and the weight mailbox they read."""
