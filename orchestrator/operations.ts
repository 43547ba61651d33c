/**
 * Long operations started through the admin API (create, drop, activate,
 * deactivate a database): each runs in the background and records its steps,
 * so a caller can follow its progress (`GET /v1/operations/{id}`) or wait.
 * Kept by the orchestrator that runs them (see docs/decisions/0025-admin-api.md).
 */
import { randomUUID } from 'node:crypto';
import { counter } from '../common/metrics.ts';

export type OperationState = 'running' | 'succeeded' | 'failed';

export interface Operation {
  id: string;
  kind: string;
  target: string;
  state: OperationState;
  startedAt: string;
  finishedAt: string | null;
  /** What it did and what it waits for, oldest first. */
  steps: Array<{ at: string; message: string }>;
  error: string | null;
}

/** Steps of an operation that may fail with an HTTP status (400, 404, 409) rather than 500. */
export class OperationError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

const finished = counter('mg_orch_operations_total', 'Admin operations finished, by kind and state', ['kind', 'state']);

/** Operations kept for reading after they finish. */
const KEEP = 200;

export class Operations {
  private readonly ops = new Map<string, Operation>();

  /** Starts `work` in the background; `step` records progress. Resolves when it is done (the operation records how). */
  start(kind: string, target: string, work: (step: (message: string) => void) => Promise<void>): { op: Operation; done: Promise<void> } {
    const op: Operation = {
      id: randomUUID(), kind, target, state: 'running', startedAt: new Date().toISOString(), finishedAt: null, steps: [], error: null,
    };
    this.ops.set(op.id, op);
    for (const id of [...this.ops.keys()].slice(0, Math.max(0, this.ops.size - KEEP))) this.ops.delete(id);
    const step = (message: string) => void op.steps.push({ at: new Date().toISOString(), message });
    const finish = (state: OperationState, error: string | null) => {
      Object.assign(op, { finishedAt: new Date().toISOString(), error, state });
      finished.inc({ kind, state });
    };
    const done = work(step).then(() => finish('succeeded', null), (err: Error) => finish('failed', err.message));
    return { op, done };
  }

  get(id: string): Operation | undefined {
    return this.ops.get(id);
  }

  list(): Operation[] {
    return [...this.ops.values()].reverse();
  }
}
