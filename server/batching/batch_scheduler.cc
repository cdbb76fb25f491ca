// BatchScheduler is a template, all in the header; this file checks that the header stands alone.
#include "server/batching/batch_scheduler.h"
