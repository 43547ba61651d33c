/**
 * Materializer workflows as a pure fold of workflow events. The materializer,
 * the CLI and the REST API build their view with this one function.
 *
 * The workflows topic is compacted by key, one key per aspect of a workflow
 * (definition, operator command, status, VDiff), so each aspect is kept on its
 * own and nothing depends on having seen another aspect first.
 */
import type {
  VDiffReported, VDiffRequested, WorkflowAction, WorkflowCommanded, WorkflowCreated, WorkflowEvent, WorkflowStatus,
} from './generated/types.ts';

const NS = 'io.multigres.workflow.';

type Payload = WorkflowEvent['payload'];
export type WorkflowPayloadKind = 'WorkflowCreated' | 'WorkflowCommanded' | 'WorkflowStatus' | 'VDiffRequested' | 'VDiffReported';
type Body<K extends WorkflowPayloadKind> = Extract<Payload, Record<`${typeof NS}${K}`, unknown>>[`${typeof NS}${K}`];

/** Builds the wrapped-union payload avsc expects from a kind and its body. */
export function workflowPayload<K extends WorkflowPayloadKind>(kind: K, body: Body<K>): Payload {
  return { [NS + kind]: body } as unknown as Payload;
}

export function workflowKind(event: WorkflowEvent): { kind: WorkflowPayloadKind; body: Body<WorkflowPayloadKind> } {
  const [name, body] = Object.entries(event.payload)[0] as [string, Body<WorkflowPayloadKind>];
  return { kind: name.slice(NS.length) as WorkflowPayloadKind, body };
}

/** The Kafka key of an event: one key per aspect of one workflow. */
export function workflowKey(event: WorkflowEvent): string {
  const base = `workflow/${event.workflow}`;
  switch (workflowKind(event).kind) {
    case 'WorkflowCreated': return base;
    case 'WorkflowCommanded': return `${base}/command`;
    case 'WorkflowStatus': return `${base}/status`;
    case 'VDiffRequested': case 'VDiffReported': return `${base}/vdiff`;
  }
}

export interface WorkflowRecord {
  name: string;
  definition: WorkflowCreated;
  createdAt: Date;
  /** The operator's last command (START when none was given). */
  action: WorkflowAction;
  commandAt: Date;
  status: WorkflowStatus | undefined;
  statusAt: Date | undefined;
  vdiffRequest: VDiffRequested | undefined;
  vdiff: (VDiffReported & { at: Date }) | undefined;
}

export type WorkflowState = Map<string, WorkflowRecord>;

/** Facts about workflows whose definition has not been folded (yet). */
type Pending = Partial<Omit<WorkflowRecord, 'name' | 'definition' | 'createdAt'>>;
const early = new WeakMap<WorkflowState, Map<string, Pending>>();

export function applyWorkflowEvent(state: WorkflowState, event: WorkflowEvent): WorkflowState {
  const { kind, body } = workflowKind(event);
  const name = event.workflow;
  if (kind === 'WorkflowCreated') {
    // A (re-)created workflow starts from nothing but what was said of it before its definition arrived.
    const pending = state.has(name) ? {} : early.get(state)?.get(name) ?? {};
    early.get(state)?.delete(name);
    state.set(name, {
      name, definition: body as WorkflowCreated, createdAt: event.ts, action: 'START', commandAt: event.ts,
      status: undefined, statusAt: undefined, vdiffRequest: undefined, vdiff: undefined, ...pending,
    });
    return state;
  }
  let rec: Pending | undefined = state.get(name);
  if (!rec) {
    const pending = early.get(state) ?? new Map<string, Pending>();
    early.set(state, pending);
    rec = pending.get(name) ?? {};
    pending.set(name, rec);
  }
  switch (kind) {
    case 'WorkflowCommanded':
      rec.action = (body as WorkflowCommanded).action;
      rec.commandAt = event.ts;
      break;
    case 'WorkflowStatus':
      rec.status = body as WorkflowStatus;
      rec.statusAt = event.ts;
      break;
    case 'VDiffRequested':
      rec.vdiffRequest = body as VDiffRequested;
      rec.vdiff = undefined;
      break;
    case 'VDiffReported':
      rec.vdiff = { ...(body as VDiffReported), at: event.ts };
      break;
  }
  return state;
}

export function foldWorkflows(events: Iterable<WorkflowEvent>): WorkflowState {
  const state: WorkflowState = new Map();
  for (const e of events) applyWorkflowEvent(state, e);
  return state;
}

/** Workflow names: what a topic key and a Postgres identifier both take. */
export const WORKFLOW_NAME = /^[a-z][a-z0-9_]{0,62}$/;
