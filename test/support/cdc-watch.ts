/**
 * What the CDC tests watch on a test cluster's event log: every stream status
 * and agent command result as it arrives, and agent commands sent with their
 * answer awaited.
 */
import { randomUUID } from 'node:crypto';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import type { AgentAction, AgentCommandResult, CdcStreamStatus } from '../../schemas/index.ts';
import { testEventLog } from './env.ts';
import { until } from './wait.ts';

export class CdcWatch {
  readonly statuses: CdcStreamStatus[] = [];
  readonly results: AgentCommandResult[] = [];
  private subs: Subscription[] = [];

  private constructor(readonly eventLog: EventLog) {}

  static async open(topicPrefix: string): Promise<CdcWatch> {
    const w = new CdcWatch(await testEventLog(topicPrefix));
    w.subs = [
      await w.eventLog.subscribe('cdcStatus', (s) => void w.statuses.push(s)),
      await w.eventLog.subscribe('agentResults', (r) => void w.results.push(r)),
    ];
    return w;
  }

  /** Sends an agent command and waits for its result. */
  async command(instanceId: string, action: AgentAction, args: Record<string, string> = {}): Promise<AgentCommandResult> {
    const commandId = randomUUID();
    await this.eventLog.publisher('agentCommands')([{ key: instanceId, value: { commandId, instanceId, issuedAt: new Date(), issuedBy: 'test', action, args } }]);
    return until(`result of ${action}`, 60_000, () => this.results.find((r) => r.commandId === commandId));
  }

  async close(): Promise<void> {
    await Promise.all(this.subs.map((s) => s.stop()));
    await this.eventLog.close();
  }
}
