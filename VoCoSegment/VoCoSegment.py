"""VoCoSegment: segment or classify a volume with a VoCo model, correct it, collect a cohort, finetune.

Thin Slicer module: the widget binds the .ui to a parameter node and copies onto widgets what the presenters in
VoCoSlicerLib decide (no torch in the Slicer process; every job is a ``PythonSlicer -m vocoslicer`` child).
"""

import sys

from VoCoSlicerLib.compat import unsupported_message

if unsupported_message(sys.version_info):  # older Slicer: this message, not an error from newer code below
    raise ImportError(unsupported_message(sys.version_info))

import logging
import pathlib
from typing import Annotated

import ctk
import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import cohort_view, models_view, module_support, panels, plots, segment_flow
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import CohortParams, FinetuneParams, SegmentParams
from VoCoSlicerLib.state import JobState

PARAMETERS_SET_BY_CODE = ("model",)  # no standard widget binds a dynamic list: modelComboBox writes it
DOCS = "https://github.com/vocoslicer/VoCoSlicer#readme"


class VoCoSegment(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoSlicer", "Segmentations"]  # embeds the Segment Editor widget
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Segment or classify a CT volume with a VoCo model, correct the result with the "
                                 "Segment Editor, add corrected cases to a cohort and finetune the model on it. "
                                 "Set up PyTorch and models in the VoCoSlicer module.") + \
            f' <a href="{DOCS}">' + _("Documentation") + "</a>"
        self.parent.acknowledgementText = _("VoCo: Wu, Zhuang, Chen, Large-Scale 3D Medical Image Pre-training "
                                            "with Geometric Context Priors. PUMIT: Luo et al.")


@parameterNodeWrapper
class VoCoSegmentParameterNode:
    """What the panel edits; mirrors VoCoSlicerLib.params (SegmentParams, CohortParams, FinetuneParams)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    fast: bool = False
    useWarmWorker: bool = True
    show3D: bool = False
    cohortDir: pathlib.Path
    annotator: str = ""
    steps: Annotated[int, WithinRange(1, 1000000)] = 200
    learningRate: Annotated[float, WithinRange(1e-6, 0.1)] = 1e-4
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    semiSupervised: bool = True
    vocoLoss: bool = False


class VoCoSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: binds the UI, starts jobs, polls them with a QTimer, turns their outputs into nodes."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self._parameterNode, self._parameterNodeGuiTag = None, None, None
        self._worker = self._task = self._onSuccess = self._download = None
        self._entries, self._segmentWhenListed = [], False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSegmentLogic()
        self.jobDriver = JobDriver(_("Segment"), on_finished=self._onJobFinished)
        self.cohortDriver = JobDriver(_("Add"), on_finished=self._onCohortFinished)
        self.finetuneDriver = JobDriver(_("Finetune"), on_finished=self._onFinetuneFinished)
        self.modelsDriver = JobDriver(_("Models"), on_finished=self._onModelsFinished)
        self.curves = plots.LiveChart(_("Finetune"))
        self.logView = module_support.LogFollower()
        self._tick = module_support.TimerTick(lambda text: slicer.util.errorDisplay(text, windowTitle="VoCoSegment"))
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.logTextEdit.setMaximumBlockCount(2000)
        self.ui.cohortDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        editor = self.ui.segmentEditorWidget
        editor.setMRMLSegmentEditorNode(segment_flow.segment_editor_node(slicer.mrmlScene))
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._syncEditor)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._syncEditor)
        self.ui.cohortDirPathLineEdit.connect("currentPathChanged(QString)", self.onCohortFolderChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", lambda: self._runOnVolume("segment"))
        self.ui.classifyButton.connect("clicked(bool)", lambda: self._runOnVolume("classify"))
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addToCohortButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=True))
        self.ui.addUnlabelledButton.connect("clicked(bool)", lambda: self.onAddToCohort(labelled=False))
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.resumeFinetuneButton.connect("clicked(bool)", self.onResumeFinetune)
        self.initializeParameterNode()
        self.onRefreshModels()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
        self._timer.stop()
        for driver in (self.jobDriver, self.cohortDriver, self.modelsDriver):
            driver.cancel()  # finetune runs are detached on purpose: they survive the panel
        if self._worker is not None:
            self._worker.close()

    def enter(self):
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self._syncEditor()

    def exit(self):  # as Slicer's SegmentEditor.py: no effect, shortcuts or view observers left behind
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.ui.segmentEditorWidget.removeViewObservations()
        self.setParameterNode(None)

    def onEffectRegistered(self):
        self.ui.segmentEditorWidget.updateEffectList()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.curves.reset()
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneEndClose(self, caller, event):
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(segment_flow.segment_editor_node(slicer.mrmlScene))
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        import VoCoSlicerLib

        VoCoSlicerLib.reload_package()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = segment_flow.default_input_volume(slicer.mrmlScene)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def _syncEditor(self, _node=None):
        editor = self.ui.segmentEditorWidget
        segment_flow.sync_editor(editor.setSegmentationNode, editor.setSourceVolumeNode,
                                 self.ui.outputSegmentationSelector.currentNode(),
                                 self.ui.inputVolumeSelector.currentNode())

    def _python(self):
        return module_support.job_python(qt.QSettings())

    def _cohortParams(self):
        return CohortParams(cohortDir=module_support.path_text(self._parameterNode.cohortDir),
                            annotator=self._parameterNode.annotator)

    def _startTimer(self):
        if not self._timer.isActive():
            self._timer.start()
        self._updateGUI()

    # ------------------------------------------------------------------ segment / classify
    def _runOnVolume(self, op):
        for driver in (self.jobDriver, self.modelsDriver if self._download else None):
            if driver is not None and driver.busy:
                driver.cancel()
                self._updateGUI()
                return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the job."), waitCursor=True):
            pn = self._parameterNode
            entry = self._entries[self.ui.modelComboBox.currentIndex] if self._entries else None
            if entry is None:
                raise ValueError(_("The model list is not loaded yet (see Refresh)."))
            if op == "segment" and entry.kind == "download":
                if slicer.util.confirmOkCancelDisplay(models_view.download_question(entry)):
                    self._startModelsJob(models_view.download_args(entry.row), download=entry.spec)
                return
            if pn.inputVolume is None:
                raise ValueError(_("Select an input volume first."))
            params = SegmentParams(model=pn.model, device=pn.device, fast=pn.fast, useWarmWorker=pn.useWarmWorker,
                                   show3D=pn.show3D)
            prepare = segment_flow.prepare_segment if op == "segment" else segment_flow.prepare_classify
            self._task = prepare(pn.inputVolume, params, slicer.util.tempDirectory())
            if op == "segment":
                self._task.segmentation = pn.outputSegmentation
            self._onSuccess = self._loadSegmentation if op == "segment" else self._loadClassification
            self.jobDriver.state.action = _("Segment") if op == "segment" else _("Classify")
            self.jobDriver.python = self._python()
            if params.useWarmWorker:
                self.jobDriver.start_request(self._warmWorker(), op, self._task.request, fallback=self._task.args)
            else:
                self.jobDriver.start([self._task.args], python=self._python())
            self._startTimer()

    def _warmWorker(self):
        from VoCoSlicerLib.worker_client import WorkerClient

        if self._worker is None or self._worker.python != self._python():
            if self._worker is not None:
                self._worker.close()
            self._worker = WorkerClient(python=self._python())
        return self._worker

    def _loadSegmentation(self):
        result = self.jobDriver.result or {}
        artifact = self.jobDriver.artifact("segmentation") or ({
            "labels": result.get("labels"), "model": result.get("model_id") or result.get("model"),
            "model_version": result.get("model_version")} if result else None)
        task = self._task
        seg = segment_flow.load_segment_result(slicer.mrmlScene, task, task.volume, task.segmentation, artifact)
        if self._parameterNode is not None:
            self._parameterNode.outputSegmentation = seg
        self._syncEditor()
        if self._parameterNode is not None and self._parameterNode.show3D:
            seg.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=task.volume)

    def _loadClassification(self):
        table = segment_flow.load_classify_result(slicer.mrmlScene, self._task, self._task.volume)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def _onJobFinished(self, driver):  # runs inside the timer tick: errors go to its single report
        onSuccess, self._onSuccess = self._onSuccess, None
        if driver.state.state is JobState.DONE and onSuccess is not None:
            try:
                onSuccess()
            except segment_flow.StaleResult as exc:
                driver.state.message = str(exc)
                driver.log.append(str(exc))

    # ------------------------------------------------------------------ models
    def onRefreshModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to list models.")):
            if not self.modelsDriver.busy:
                self._startModelsJob(models_view.list_args())

    def _startModelsJob(self, args, download=None):
        self._download = download  # a listing keeps a run folder (its JSON is read back); a download reports
        self.modelsDriver.start([args], run_dir=None if download else slicer.util.tempDirectory(),
                                python=self._python())
        self._startTimer()

    def _onModelsFinished(self, driver):
        download, self._download = self._download, None
        if driver.state.state is not JobState.DONE:
            self.ui.modelInfoLabel.text = _("Model job failed: ") + (driver.state.message or driver.state.state.value)
            return
        if download:  # installed: list again, select it, then run the Segment the user asked for
            self._parameterNode.model, self._segmentWhenListed = download.split("@")[0], True
            qt.QTimer.singleShot(0, self.onRefreshModels)
            return
        self._entries = models_view.selector_entries(models_view.parse_catalog(driver.json_output()))
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for entry in self._entries:
            combo.addItem(entry.text, entry.spec)
        combo.setCurrentIndex(models_view.default_index(self._entries, self._parameterNode.model
                                                        if self._parameterNode else ""))
        combo.blockSignals(False)
        self.onModelSelected(combo.currentIndex)
        if self._segmentWhenListed:
            self._segmentWhenListed = False
            qt.QTimer.singleShot(0, lambda: self._runOnVolume("segment"))

    def onModelSelected(self, index):
        if self._parameterNode is None or not 0 <= index < len(self._entries):
            return
        self._parameterNode.model = self._entries[index].spec
        self.ui.modelInfoLabel.text = models_view.info_text(self._entries[index])
        self._updateGUI()

    # ------------------------------------------------------------------ cohort
    def onAddToCohort(self, labelled):
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case to the cohort."), waitCursor=True):
            pn = self._parameterNode
            seg = pn.outputSegmentation if labelled else None
            if labelled and seg is None:
                raise ValueError(_("Segment the volume (and correct it) first."))
            if pn.inputVolume is None:
                raise ValueError(_("Select an input volume first."))
            commands = segment_flow.prepare_cohort_case(slicer.mrmlScene, pn.inputVolume, seg,
                                                        self._cohortParams(), slicer.util.tempDirectory())
            commands.append(self._cohortParams().list_args())
            self.cohortDriver.start(commands, run_dir=slicer.util.tempDirectory(), python=self._python())
            self._startTimer()

    def onCohortFolderChanged(self, path):
        params = CohortParams(cohortDir=module_support.path_text(path))  # the parameter node may lag behind
        if self.cohortDriver.busy:
            return
        if not cohort_view.is_cohort(params.cohortDir):
            self.ui.cohortCountsLabel.text = _("New cohort: created on the first add.") if params.cohortDir else ""
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to read the cohort.")):
            self.cohortDriver.start([params.list_args()], run_dir=slicer.util.tempDirectory(), python=self._python())
            self._startTimer()

    def _onCohortFinished(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.cohortCountsLabel.text = _("Not added: ") + driver.state.message
            return
        self.ui.cohortCountsLabel.text = cohort_view.counts_from_list(driver.json_output()).summary()

    # ------------------------------------------------------------------ finetune
    def onFinetuneButton(self):
        if self.finetuneDriver.busy:
            self.finetuneDriver.cancel()
            self._updateGUI()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start finetuning."), waitCursor=True):
            pn = self._parameterNode
            params = FinetuneParams(baseModel=pn.model, cohortDir=self._cohortParams().cohortDir, steps=pn.steps,
                                    learningRate=pn.learningRate, batchSize=pn.batchSize,
                                    semiSupervised=pn.semiSupervised, vocoLoss=pn.vocoLoss, device=pn.device)
            runDir = new_run_dir("finetune")
            self.finetuneDriver.start([params.args(str(runDir))], run_dir=runDir, detached=True,
                                      python=self._python())
            self._followCurves()

    def onResumeFinetune(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to resume finetuning."), waitCursor=True):
            runs = panels.resumable(list_runs(), "finetune")
            if not runs:
                raise ValueError(_("There is no stopped finetune run to resume."))
            self.finetuneDriver.python = self._python()
            self.finetuneDriver.resume(runs[0], detached=True)
            self._followCurves()

    def _followCurves(self):
        slicer.modules.plots.logic().ShowChartInLayout(self.curves.follow(slicer.mrmlScene))
        self._startTimer()

    def _drawCurves(self):
        if self.curves.update(slicer.mrmlScene, self.finetuneDriver.metrics, create=self.finetuneDriver.busy):
            slicer.modules.plots.logic().ShowChartInLayout(self.curves.chart(slicer.mrmlScene))
        if self.curves.error:
            logging.warning(self.curves.error)

    def _onFinetuneFinished(self, driver):
        model = driver.artifact("model")
        if driver.state.state is JobState.DONE and model:
            if self._parameterNode is not None:
                self._parameterNode.model = model["path"]  # selected once the refreshed list arrives
            qt.QTimer.singleShot(0, self.onRefreshModels)
            driver.state.message = _("New model {id} {version} (validation Dice {dice})").format(
                id=model.get("id", ""), version=model.get("version", ""), dice=model.get("val_dice", "?"))

    # ------------------------------------------------------------------ polling and GUI state
    def _onTimer(self):
        drivers = (self.jobDriver, self.cohortDriver, self.finetuneDriver, self.modelsDriver)
        self._tick([*[(d.state.action, d.tick) for d in drivers if d.busy], (_("Live curves"), self._drawCurves),
                    (_("Panel update"), self._updateGUI)])
        if not any(d.busy for d in drivers):
            self._timer.stop()

    def _updateGUI(self):
        downloading = self._download is not None and self.modelsDriver.busy
        job = self.modelsDriver if downloading else self.jobDriver
        segmenting = downloading or self.jobDriver.state.action == _("Segment")
        panels.show_job(panels.job_widgets(job), self.ui.segmentButton if segmenting else self.ui.classifyButton,
                        self.ui.progressBar, self.ui.statusLabel)
        idle = not job.busy
        self.ui.segmentButton.enabled = idle or segmenting
        self.ui.classifyButton.enabled = idle or not segmenting
        if idle:
            self.ui.segmentButton.text, self.ui.classifyButton.text = _("Segment"), _("Classify")
        panels.show_job(panels.job_widgets(self.finetuneDriver), self.ui.finetuneButton,
                        self.ui.finetuneProgressBar, self.ui.finetuneStatusLabel)
        self.ui.resumeFinetuneButton.enabled = not self.finetuneDriver.busy
        self.ui.addToCohortButton.enabled = self.ui.addUnlabelledButton.enabled = idle and not self.cohortDriver.busy
        self.ui.refreshModelsButton.enabled = not self.modelsDriver.busy
        self.logView.show(self.ui.logTextEdit, [(f"[{d.state.action}] ", d.log) for d in (
            self.jobDriver, self.cohortDriver, self.finetuneDriver, self.modelsDriver)])


class VoCoSegmentLogic(ScriptedLoadableModuleLogic):
    """Parameter node only; the work itself is in VoCoSlicerLib."""

    def getParameterNode(self):
        return VoCoSegmentParameterNode(super().getParameterNode())


class VoCoSegmentTest(ScriptedLoadableModuleTest):
    """In-app test: phantom -> segment with the bundled model -> correct -> cohort; skips without torch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_and_add_to_cohort()

    def _run(self, driver, timeout=600):
        self.assertTrue(module_support.wait_for(driver, slicer.app.processEvents, timeout), "job timed out")
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)

    def test_segment_phantom_and_add_to_cohort(self):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed (installs are skipped in testing mode)")
        tmp = pathlib.Path(slicer.util.tempDirectory())
        driver = JobDriver("test", log_lines=100)
        driver.start([["phantom", "--seed", "7", "--size", "64", "64", "32", "-o", str(tmp / "ph"),
                       "--format", ".nrrd"]])
        self._run(driver)
        volume = slicer.util.loadVolume(str(sorted((tmp / "ph").glob("*_ct.nrrd"))[0]))
        task = segment_flow.prepare_segment(volume, SegmentParams(device="cpu", fast=True), tmp / "job")
        driver.start([task.args])
        self._run(driver)
        seg = segment_flow.load_segment_result(slicer.mrmlScene, task, volume,
                                               artifact=driver.artifact("segmentation"))
        self.assertGreaterEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        cohort = CohortParams(cohortDir=str(tmp / "cohort"), annotator="self-test")
        commands = segment_flow.prepare_cohort_case(slicer.mrmlScene, volume, seg, cohort, tmp / "case")
        driver.start([*commands, cohort.list_args()], run_dir=tmp / "cohort-runs")
        self._run(driver)
        counts = cohort_view.counts_from_list(driver.json_output())
        self.assertEqual((counts.total, counts.labelled), (1, 1))
        logging.info("VoCoSegment self-test passed")
        self.delayDisplay("Test passed")
