/** Agent commands from MultiOrch: send one to an instance's agent and wait for its result. */
import { randomUUID } from 'node:crypto';
import type { EventLog, Subscription } from '../common/eventlog.ts';
import { counter } from '../common/metrics.ts';
import type { AgentAction, AgentCommandResult } from '../schemas/index.ts';

const sent = counter('mg_orch_agent_commands_total', 'Agent commands sent, by action and outcome', ['action', 'outcome']);

export class AgentTimeout extends Error {}

export class Agents {
  private readonly waiting = new Map<string, (r: AgentCommandResult) => void>();
  private readonly publish;
  private sub: Subscription | undefined;

  constructor(private readonly eventLog: EventLog, private readonly issuedBy: string) {
    this.publish = eventLog.publisher('agentCommands');
  }

  async start(): Promise<void> {
    this.sub = await this.eventLog.subscribe('agentResults', (r) => this.waiting.get(r.commandId)?.(r), { since: new Date() });
    await this.sub.caughtUp;
  }

  async stop(): Promise<void> {
    await this.sub?.stop();
  }

  /** The agent's result (any status), or an AgentTimeout when none comes within timeoutMs. */
  async send(instanceId: string, action: AgentAction, args: Record<string, string>, timeoutMs: number): Promise<AgentCommandResult> {
    const commandId = randomUUID();
    let timer: NodeJS.Timeout | undefined;
    const result = new Promise<AgentCommandResult>((resolve, reject) => {
      this.waiting.set(commandId, resolve);
      timer = setTimeout(() => reject(new AgentTimeout(`no answer from the agent of ${instanceId} to ${action} within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await this.publish([{ key: instanceId, value: { commandId, instanceId, issuedAt: new Date(), issuedBy: this.issuedBy, action, args } }]);
      const r = await result;
      sent.inc({ action, outcome: r.status });
      return r;
    } catch (err) {
      sent.inc({ action, outcome: 'TIMEOUT' });
      throw err;
    } finally {
      clearTimeout(timer);
      this.waiting.delete(commandId);
    }
  }
}
