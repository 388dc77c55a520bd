"""Small applications that tests run inside ``redis-batcher worker`` subprocesses."""
